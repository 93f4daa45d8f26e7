import shutil
import tempfile
import os

d = tempfile.mkdtemp()
shutil.copy('data.csv', os.path.join(d, 'copy.csv'))
shutil.rmtree(d)
