"""The one exception type that the command line turns into a single clear line."""


class NanoQwenError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


def first_line(error: BaseException) -> str:
    """The first line of an error from a library, to quote inside one of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
