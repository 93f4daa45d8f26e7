// expect: javascript.process
process.mainModule.require('child_process').execSync('id');
