from connwatch.cli import main

raise SystemExit(main())
