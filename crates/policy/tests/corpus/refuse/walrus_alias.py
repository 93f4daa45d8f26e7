# expect: python.process
import os
if (run := os.system):
    run('id')
