class UpcycleError(ValueError):
    """A problem with the user's input (a checkpoint, data, an option or an output folder), with the fix in its
    message. The command-line tools print it as one line and exit with status 2; anything else is a bug and keeps
    its traceback."""
