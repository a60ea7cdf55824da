# The trap-cost experiment's chart (bench/run.sh, `./run-qemu.sh --bench`), from
# bench/results.csv: per op, on a log scale, the instructions natively and under the VMM with
# both shadow policies, the judged policy's modelled cycles (its instructions + traps per op × C),
# and the op's target as a black line across its group (on the judged VMM bar's scale; on the
# modelled bar's for a "modelled" target).
# Called as: gnuplot -e "csv='results.csv'; png='results.png'; trap_cost=700; judged='cached'" plot.gp
# Columns used: 1 op, 3 native, 4 vmm_flush, 5 vmm_cached, 9 modelled_cycles, 12 target_limit;
# the '#' lines at the top (metadata, units) are comments to gnuplot.
if (!exists("trap_cost")) trap_cost = 700
if (!exists("judged")) judged = 'cached'
set datafile separator ','
# The groups stand at x = 0, 1, ... (the row's number, `column(0)`): the x range is the rows'.
stats csv every ::1 using 3 nooutput
rows = STATS_records
set terminal pngcairo size 1600,900 font ',11'
set output png
set title 'What each operation costs: native vs the trap-and-emulate VMM, under -icount (1 instruction = 1 cycle)'
set logscale y
set format y '10^{%L}'
set ylabel 'instructions per op (modelled: cycles per op), log scale'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
# Labels end at their group and run down to the left, so long op names stay inside the image.
set xtics rotate by 35 right noenhanced nomirror
set bmargin 10
set xrange [-0.6 : rows - 0.4]
set key inside top left Left reverse box opaque samplen 2 maxrows 5
set grid ytics
set yrange [0.5:*]
# One row a group; `every ::1` skips the header. Values below 1 are drawn at 1 (log scale).
plot csv using ($3 < 1 ? 1 : $3):xtic(1) every ::1 title 'native' lc rgb '#8e44ad', \
     '' using ($4 < 1 ? 1 : $4) every ::1 title 'VMM, shadow=flush' lc rgb '#16a085', \
     '' using ($5 < 1 ? 1 : $5) every ::1 title 'VMM, shadow=cached' lc rgb '#5dade2', \
     '' using ($9 < 1 ? 1 : $9) every ::1 \
        title sprintf('modelled cycles, shadow=%s (+ %d per trap)', judged, trap_cost) lc rgb '#f5b041', \
     '' using 0:12:(0.45) every ::1 with xerrorbars lc rgb 'black' lw 3 pt 0 \
        title sprintf('target, on the shadow=%s bar (on the modelled bar for a "modelled" target)', judged)
