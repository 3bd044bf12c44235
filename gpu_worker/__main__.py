from gpu_worker.cli import main

raise SystemExit(main())
