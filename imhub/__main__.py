from imhub import cli

raise SystemExit(cli.main())
