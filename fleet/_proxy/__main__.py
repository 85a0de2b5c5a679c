from fleet._proxy.process import main

main()
