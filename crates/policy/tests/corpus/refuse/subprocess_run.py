# expect: python.process
import subprocess
subprocess.run(['ls', '-la'], check=True)
