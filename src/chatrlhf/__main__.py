from chatrlhf.cli import main

raise SystemExit(main())
