from ksmctl.entry import main

main()
