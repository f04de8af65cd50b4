"""The ``hybrid`` command line (``hybrid.cli.main``): above ``hybrid`` and ``convert``, imported by nothing."""
