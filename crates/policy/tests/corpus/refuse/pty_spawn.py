# expect: python.process
import pty
pty.spawn('/bin/sh')
