# expect: python.process
from subprocess import Popen, PIPE
Popen(['id'], stdout=PIPE)
