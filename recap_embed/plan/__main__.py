from recap_embed.plan.app import main

main()
