class CheckpointError(ValueError):
    """Raised when weights or a checkpoint file cannot be loaded: missing, unexpected or
    mis-shaped parameters, a damaged file, or a file of an unsupported format version.
    """
