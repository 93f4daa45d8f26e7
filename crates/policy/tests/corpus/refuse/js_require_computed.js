// expect: javascript.process
const name = ['child', 'process'].join(process.env.SEP);
require(name).exec('id');
