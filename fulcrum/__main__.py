from fulcrum.cli import main

raise SystemExit(main())
