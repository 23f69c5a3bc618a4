from rptq_onnx.cli import main

raise SystemExit(main())
