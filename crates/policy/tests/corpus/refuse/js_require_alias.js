// expect: javascript.process
const r = require;
r('child' + '_process').exec('id');
