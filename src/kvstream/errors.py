class KVStreamError(ValueError):
    """Bad input (a parameter, a file, a model we cannot handle).

    The message names the field and the fix. The command line prints it without a traceback and
    exits with status 2, before any expensive work and without leaving partial outputs.
    """
