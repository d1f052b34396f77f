# `python -m cudacnn ...` (what torchrun -m cudacnn runs).
from cudacnn.cli import main

raise SystemExit(main())
