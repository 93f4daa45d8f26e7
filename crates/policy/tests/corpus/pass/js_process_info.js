console.log(process.argv.length, typeof process.env.HOME, process.platform, process.version.startsWith('v'));
