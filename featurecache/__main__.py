from featurecache.cli.main import main

main()
