import sys

from echo_stage import EchoConfig, main
from hala.contract import step

if __name__ == "__main__":
    sys.exit(step.run("echo", EchoConfig, main))
