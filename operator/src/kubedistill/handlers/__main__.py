from kubedistill.handlers.main import main

main()
