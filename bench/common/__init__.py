"""Code the bench scripts share, so that no script is another's library.

``bench/`` is not a package: a script run as ``python bench/x.py`` has ``bench/`` first on ``sys.path``, and so
imports this package as ``common`` (``from common.procs import Managed``), as it imports its sibling scripts by
bare name. Tests that load a bench script put ``bench/`` on ``sys.path`` the same way (tests/models/test_soak.py).

By theme, each module importing only the standard library and the modules listed before it:

- ``ports``: ``HOST`` and ``free_ports`` (standard library only: tests/helpers.py loads it by file path);
- ``log``: the progress line on stderr;
- ``procs``: the processes a bench starts (``Managed``, ``wait_for``), and the CPU they use;
- ``http_json``: one JSON request with the standard library (health checks, management calls);
- ``gateways``: starting ``liftoff serve`` from a config, and the echo gateway of the gateway benches;
- ``load``: the keep-alive HTTP/1.1 load generator (phases, clients, figures);
- ``report``: the command, date and machine of a run, and the report pieces several benches print.
"""
