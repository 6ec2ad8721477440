"""The one exception type that the command line turns into a single clear line."""


class NanoQwenError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
