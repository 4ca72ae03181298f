// Mask helpers shared by the annotation page (annotate.html) and the review page
// (review.html): COCO RLE decoding and the brush / eraser stroke path.

// Run lengths of a COCO compressed RLE string (pycocotools' rleFrString): each count is a
// little-endian base-32 number in chars 48..111, 0x20 = more chunks, 0x10 on the last = negative;
// from the third count on, the value is the difference to the count two before.
function cocoCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10) && 5 * k < 32) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A COCO RLE ({size: [h, w], counts: str}) as column-major bits (index x * h + y).
function maskBits(rle) {
  const h = rle.size[0], w = rle.size[1];
  const bits = new Uint8Array(h * w);
  let position = 0, value = 0;
  for (const run of cocoCounts(rle.counts)) {
    if (value) bits.fill(1, position, position + run);
    position += run;
    value ^= 1;
  }
  return bits;
}

function strokePath(c, stroke) {
  c.beginPath();
  const [x0, y0] = stroke.points[0];
  c.moveTo(x0 + 0.5, y0 + 0.5);
  for (const [x, y] of stroke.points) c.lineTo(x + 0.5, y + 0.5);
  if (stroke.points.length === 1) c.lineTo(x0 + 0.5, y0 + 0.5001);
}
