// A drawing pad: white ink on a black canvas, with a mouse, pen or finger (pointer events).

export class DrawingPad {
  /** `onStroke()` runs when the pen lifts; `wrap` gets the class "inked" once drawn on. */
  constructor(canvas, wrap, onStroke) {
    this.canvas = canvas;
    this.wrap = wrap;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.drawing = false;
    this.last = null;
    this.clear();
    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      this.drawing = true;
      this.last = this.point(event);
      this.strokeTo({ x: this.last.x + 0.01, y: this.last.y }); // a tap leaves a dot
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!this.drawing) return;
      const events = event.getCoalescedEvents?.() ?? [];
      for (const e of events.length ? events : [event]) this.strokeTo(this.point(e));
    });
    const finish = () => {
      if (!this.drawing) return;
      this.drawing = false;
      onStroke();
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
  }

  clear() {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.wrap.classList.remove("inked");
  }

  /** The canvas's RGBA pixels: {rgba, width, height}. */
  pixels() {
    const { width, height } = this.canvas;
    return { rgba: this.ctx.getImageData(0, 0, width, height).data, width, height };
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    };
  }

  strokeTo(point) {
    const ctx = this.ctx;
    ctx.strokeStyle = "#fff";
    // A ninth of the width: about one pixel wide at 8x8, like the digits the model learned.
    ctx.lineWidth = this.canvas.width / 9;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(this.last.x, this.last.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
    this.last = point;
    this.wrap.classList.add("inked");
  }
}
