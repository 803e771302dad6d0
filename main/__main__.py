from main.main import main

main()
