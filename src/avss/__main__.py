from avss.cli import main

main()
