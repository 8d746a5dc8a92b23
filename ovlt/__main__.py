from ovlt.cli import main

raise SystemExit(main())
