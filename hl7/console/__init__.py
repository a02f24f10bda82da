"""The operator console: server-rendered pages on the daemon's HTTP endpoint (``/console/``).

``hl7.console.app.ConsoleApp`` serves them; ``hl7.console.passwords`` (standard
library only) hashes and checks the passwords configured in ``[console]``.
See docs/console.md.
"""
