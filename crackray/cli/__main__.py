from crackray.cli import main

main()
