# expect: python.process
import os
vars(os)['system']('id')
