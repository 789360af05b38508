from p2pfiles.cli import main

main()
