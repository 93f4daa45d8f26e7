import zipfile

with zipfile.ZipFile('out.zip', 'w') as z:
    z.write('data.csv')
print(zipfile.ZipFile('out.zip').namelist())
