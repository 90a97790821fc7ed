from sdprune.cli import main

main(prog_name="sdprune")
