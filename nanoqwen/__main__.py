from nanoqwen.cli import main

raise SystemExit(main())
