from diffalign.core.cli import cli_main

cli_main()
