# expect: python.process
import os
os.posix_spawn('/bin/id', ['id'], dict(os.environ))
