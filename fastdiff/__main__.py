from fastdiff.cli import main

raise SystemExit(main())
