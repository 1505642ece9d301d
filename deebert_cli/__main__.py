from deebert_cli.cli.app import main

main()
