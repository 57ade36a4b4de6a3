"""`python -m engine.refcache build|info|verify ...` (see engine.refcache.cli)."""

from engine.refcache.cli import main

raise SystemExit(main())
