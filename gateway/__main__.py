from __future__ import annotations

from gateway.ops.cli import main

raise SystemExit(main())
