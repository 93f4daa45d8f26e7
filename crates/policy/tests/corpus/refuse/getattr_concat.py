# expect: python.process
import os
getattr(os, 'sys' + 'tem')('id')
