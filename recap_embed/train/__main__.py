from recap_embed.train.app import main

main()
