from ksmctl.cli import main

main()
