from controlset.cli import main

raise SystemExit(main())
