"""The test suite's own modules (not tests): servers and their fixtures' machinery
(``servers``), shared assertions and snapshots (``helpers``), the twin-queue runner of the lean
path tests (``twins``), the Node.js driver (``nodejs``), the cross-language checks
(``crosslang``), the reply-dropping proxy (``proxy``), and the long runs of ``make chaos``
(``chaos``, ``bounded``: also scripts, ``python tests/support/chaos.py``)."""
