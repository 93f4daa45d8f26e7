async function main() {
  await new Promise((resolve) => setTimeout(resolve, 10));
  console.log('done');
}
main();
