from fleet._replica.process import main

main()
