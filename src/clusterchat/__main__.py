from clusterchat.cli import main

raise SystemExit(main())
